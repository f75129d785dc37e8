//! End to end: hyper-util's `Client` wrapped in the layer, against a real hyper server on
//! 127.0.0.1 that answers like Groq and OpenAI do.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::{Exhausted, KeyFallbackLayer, KeySet, KeyState};

type Body = BoxBody<Bytes, Infallible>;

const GROQ_429: &str = r#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` in organization `org_01` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Used 5980, Requested 120. Please try again in 1.2s. Visit https://console.groq.com/docs/rate-limits for more information.","type":"tokens","code":"rate_limit_exceeded"}}"#;
const OPENAI_QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
const GROQ_401: &str = r#"{"error":{"message":"Invalid API Key","type":"invalid_request_error","code":"invalid_api_key"}}"#;

/// How the fake upstream treats one key.
#[derive(Clone)]
enum Mode {
    Ok,
    RateLimited,
    Quota,
    Invalid,
    Unavailable,
    /// Serves this many requests, then answers 429 like Groq.
    Budget(u64),
    /// Never answers.
    Hang,
    /// Answers 400 with a body of this many bytes.
    BigError(usize),
    /// Streams SSE: one event, then the rest once `release` is notified.
    Sse(Arc<Notify>),
}

struct Upstream {
    modes: HashMap<String, Mode>,
    counts: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

fn answer(status: u16, headers: &[(&str, &str)], body: Body) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_01jngbvsctfy0bmjw87yea904b");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

const GROQ_LIMITS: [(&str, &str); 6] = [
    ("x-ratelimit-limit-requests", "14400"),
    ("x-ratelimit-limit-tokens", "6000"),
    ("x-ratelimit-remaining-requests", "14370"),
    ("x-ratelimit-remaining-tokens", "20"),
    ("x-ratelimit-reset-requests", "2m59.56s"),
    ("x-ratelimit-reset-tokens", "1.2s"),
];

async fn handle(up: Arc<Upstream>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    // Read the whole request, as a real server does.
    let _ = req.into_body().collect().await;
    up.total.fetch_add(1, Ordering::SeqCst);
    let n = {
        let mut counts = up.counts.lock().unwrap();
        let c = counts.entry(key.clone()).or_default();
        *c += 1;
        *c
    };
    let ok = || {
        answer(
            200,
            &GROQ_LIMITS,
            full(r#"{"choices":[{"message":{"content":"hi"}}]}"#),
        )
    };
    let limited = || {
        let mut h = GROQ_LIMITS.to_vec();
        h.push(("retry-after", "60"));
        answer(429, &h, full(GROQ_429))
    };
    let res = match up.modes.get(&key).cloned() {
        None | Some(Mode::Invalid) => answer(401, &[], full(GROQ_401)),
        Some(Mode::Ok) => ok(),
        Some(Mode::RateLimited) => limited(),
        Some(Mode::Budget(max)) if n > max => limited(),
        Some(Mode::Budget(_)) => ok(),
        Some(Mode::Quota) => answer(429, &[], full(OPENAI_QUOTA)),
        Some(Mode::Unavailable) => answer(503, &[], full("")),
        Some(Mode::Hang) => std::future::pending().await,
        Some(Mode::BigError(n)) => answer(400, &[], full(vec![b'e'; n])),
        Some(Mode::Sse(release)) => {
            let frames = async_stream(release);
            let mut res = answer(200, &GROQ_LIMITS, StreamBody::new(frames).boxed());
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            res
        }
    };
    Ok(res)
}

/// The SSE frames: the first at once, the others after `release`.
fn async_stream(
    release: Arc<Notify>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _ = tx
            .send(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            ))
            .await;
        release.notified().await;
        let _ = tx
            .send(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            ))
            .await;
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    })
}

/// Starts the upstream on 127.0.0.1, port 0.
async fn serve(modes: &[(&str, Mode)]) -> (SocketAddr, Arc<Upstream>) {
    let up = Arc::new(Upstream {
        modes: modes
            .iter()
            .map(|(k, m)| (k.to_string(), m.clone()))
            .collect(),
        counts: Mutex::new(HashMap::new()),
        total: AtomicU64::new(0),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let up = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(up.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, up)
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn chat(addr: SocketAddr, stream: bool) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"llama-3.1-8b-instant","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    );
    Request::post(format!("http://{addr}/openai/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn keys(names: &[&str]) -> KeySet {
    KeySet::new(names).unwrap()
}

#[tokio::test]
async fn each_kind_of_key_failure_falls_over_to_a_working_key() {
    let (addr, up) = serve(&[
        ("k_rate", Mode::RateLimited),
        ("k_quota", Mode::Quota),
        ("k_dead", Mode::Invalid),
        ("k_down", Mode::Unavailable),
        ("k_ok", Mode::Ok),
    ])
    .await;
    let layer = KeyFallbackLayer::new(keys(&["k_rate", "k_quota", "k_dead", "k_down", "k_ok"]));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(client());
    let res = svc.oneshot(chat(addr, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{\"choices\""));
    assert_eq!(up.total.load(Ordering::SeqCst), 5);
    let s = handle.status();
    let reason = |i: usize| s.keys[i].state.clone();
    assert!(
        matches!(reason(0), KeyState::CoolingDown { remaining, .. } if remaining > Duration::from_secs(55))
    );
    assert!(
        matches!(reason(1), KeyState::CoolingDown { remaining, .. } if remaining > Duration::from_secs(3500))
    );
    assert!(matches!(reason(2), KeyState::Disabled { .. }));
    assert_eq!(reason(3), KeyState::Active);
    assert_eq!(s.keys[3].consecutive_errors, 1);
    assert_eq!(reason(4), KeyState::Active);
}

#[tokio::test]
async fn sse_streams_pass_through_unbuffered() {
    let release = Arc::new(Notify::new());
    let (addr, _) = serve(&[
        ("k_rate", Mode::RateLimited),
        ("k_sse", Mode::Sse(release.clone())),
    ])
    .await;
    let svc = ServiceBuilder::new()
        .layer(KeyFallbackLayer::new(keys(&["k_rate", "k_sse"])))
        .service(client());
    let res = svc.oneshot(chat(addr, true)).await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    // The first event arrives while the server still holds the rest back.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first event before the stream ends")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(first.starts_with(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}"));
    release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_one_mib_error_body_is_handed_back_whole() {
    const MIB: usize = 1 << 20;
    let (addr, _) = serve(&[("k_big", Mode::BigError(MIB))]).await;
    let layer = KeyFallbackLayer::new(keys(&["k_big", "k_other"]));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(client());
    let res = svc.oneshot(chat(addr, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), MIB);
    assert!(body.iter().all(|b| *b == b'e'));
    // A 400 is the request's fault: no key blamed, no replay.
    assert_eq!(handle.status().keys[1].requests, 0);
    assert_eq!(handle.status().available(), 2);
}

#[tokio::test]
async fn exhaustion_over_http_keeps_the_last_response() {
    let (addr, up) = serve(&[("k1", Mode::RateLimited), ("k2", Mode::Quota)]).await;
    let svc = ServiceBuilder::new()
        .layer(KeyFallbackLayer::new(keys(&["k1", "k2"])))
        .service(client());
    let err = svc.oneshot(chat(addr, false)).await.unwrap_err();
    let mut exhausted = err.downcast::<Exhausted>().unwrap();
    assert_eq!(exhausted.attempts(), 2);
    let wait = exhausted.retry_after().unwrap();
    assert!(
        wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    let last = exhausted.take_last_response().unwrap();
    assert_eq!(last.status(), 429);
    assert_eq!(
        last.into_body().collect().await.unwrap().to_bytes(),
        OPENAI_QUOTA
    );
    assert_eq!(up.total.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn per_attempt_timeout_inside_moves_a_hanging_key_aside() {
    let (addr, _) = serve(&[("k_hang", Mode::Hang), ("k_ok", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k_hang", "k_ok"]));
    let handle = layer.handle();
    // Timeout inside the layer: each attempt gets 300 ms.
    let svc = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_millis(300))
        .service(client());
    let res = svc.oneshot(chat(addr, false)).await.unwrap();
    assert_eq!(res.status(), 200);
    let s = handle.status();
    assert_eq!((s.keys[0].errors, s.keys[0].consecutive_errors), (1, 1));
}

#[tokio::test]
async fn overall_timeout_outside_bounds_the_whole_request() {
    let (addr, _) = serve(&[("k_hang", Mode::Hang), ("k_ok", Mode::Ok)]).await;
    let layer = KeyFallbackLayer::new(keys(&["k_hang", "k_ok"]));
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .layer(layer)
        .service(client());
    let err = svc.oneshot(chat(addr, false)).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_requests_over_three_keys_two_running_out() {
    let (addr, up) = serve(&[
        ("k1", Mode::Budget(40)),
        ("k2", Mode::Budget(70)),
        ("k3", Mode::Ok),
    ])
    .await;
    // Probing off: at start every key is half-open, and with probing the burst goes to
    // whichever key's first answer comes back first, which the scheduler decides (a slow
    // first answer from k1 sent everything to k2 and k3 on a loaded CI machine). This test
    // is about counting under concurrency, so every request may take k1 until it refuses.
    let layer = KeyFallbackLayer::builder(keys(&["k1", "k2", "k3"]))
        .probe_wait(Duration::ZERO)
        .build();
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(client());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let svc = svc.clone();
        tasks.spawn(async move {
            let res = svc.oneshot(chat(addr, false)).await?;
            let status = res.status();
            res.into_body().collect().await?;
            Ok::<_, BoxError>(status)
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        let mut statuses = Vec::new();
        while let Some(r) = tasks.join_next().await {
            statuses.push(r.unwrap().unwrap());
        }
        statuses
    })
    .await
    .expect("all requests finish in time");
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|s| *s == 200));
    let s = handle.status();
    let counted: u64 = s.keys.iter().map(|k| k.requests).sum();
    assert_eq!(counted, up.total.load(Ordering::SeqCst));
    let served: u64 = s.keys.iter().map(|k| k.successes).sum();
    assert_eq!(served, 300);
    let per_key = up.counts.lock().unwrap().clone();
    for k in &s.keys {
        let secret = ["k1", "k2", "k3"][s.keys.iter().position(|x| x.label == k.label).unwrap()];
        assert_eq!(
            k.requests,
            per_key.get(secret).copied().unwrap_or(0),
            "{}",
            k.label
        );
    }
    assert_eq!(s.keys[0].successes, 40);
    assert_eq!(s.keys[1].successes, 70);
    assert!(!s.keys[0].is_available() && !s.keys[1].is_available());
    assert!(s.keys[0].rate_limited >= 1 && s.keys[1].rate_limited >= 1);
}

#[tokio::test]
async fn works_as_a_plain_service_with_ready_and_call() {
    let (addr, _) = serve(&[("k_ok", Mode::Ok)]).await;
    let mut svc = ServiceBuilder::new()
        .layer(KeyFallbackLayer::new(keys(&["k_ok"])))
        .service(client());
    for _ in 0..3 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat(addr, false))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}
